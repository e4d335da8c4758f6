"""fastcell.shard"""
