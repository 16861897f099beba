"""interleaf.model"""
