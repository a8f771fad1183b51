from foundry.version import __version__
