"""interleaf.corpus"""
