"""The LRFormer model: tokens-last layers, encoder, LRHead and the segmentor."""
