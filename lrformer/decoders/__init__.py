"""The query decoders (Mask2Former family): pixel decoder, masked-attention decoder, matcher, losses."""
