"""fastcell.evaluate"""
