"""Training data: MDS windows (mds), mixes of streams (mixture), step geometry, the resumable phase loader
and the eval loader, the batch contract (batches), the run's tokenizer, and data fingerprints.
Everything that touches Streaming's internals is in streaming_compat.

Submodules import Streaming lazily, so importing this package stays cheap.
"""
