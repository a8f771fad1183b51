"""Hand-written GPU kernels (Triton), each behind a torch.library op with a torch reference in the tests."""
