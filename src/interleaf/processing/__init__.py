"""interleaf.processing"""
