"""fastclip's backends: "cpu" (fused C++), "triton" and "cuda" (reserved), "torch" (the reference)."""
