"""fastcell.train"""
