"""fastcell.loaders"""
