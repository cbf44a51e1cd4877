"""fastclip's backends: "cpu" (fused C++), "triton" (Triton kernels), "cuda" (CUDA C++ kernels),
"torch" (torch.nn.utils itself, the reference)."""
