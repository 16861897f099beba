"""interleaf.train"""
