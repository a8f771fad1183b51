"""Training data: MDS windows (mds), mixes of streams (mixture), step geometry, the resumable phase loader
and the eval loader, the batch contract (batches), the run's tokenizer, and data fingerprints.
Everything that touches Streaming's internals is in streaming_compat.

Submodules import Streaming lazily, so importing this package stays cheap; streaming_import makes
`import streaming` skip its example datasets (transformers, torchvision: seconds in every rank).
"""

from foundry.data.streaming_import import install as _install_streaming

_install_streaming()
