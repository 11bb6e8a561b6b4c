"""The modeling code of the three families: configurations, models, processors and their method cores.

These files are flat siblings that import only torch, transformers, numpy, PIL and the standard library, so a
checkpoint ships them as Hub remote code (`comm_vlm.hub.save_for_hub`) and loads with `trust_remote_code=True` in an
environment without comm-vlm.
"""
