"""interleaf.generation"""
