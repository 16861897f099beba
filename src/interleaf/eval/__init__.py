"""interleaf.eval"""
