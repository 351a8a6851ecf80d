"""vgen.tokenizers"""
