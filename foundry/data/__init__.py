"""Training data: MDS windows (mds), mixes of streams (mixture), resumable per-phase loaders (loader).

Submodules import Streaming lazily, so importing this package stays cheap.
"""
