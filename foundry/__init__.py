from foundry.version import __version__ as __version__
