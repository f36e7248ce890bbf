"""Where events come from: source mappings and file / SQL readers (``mappings.load_mapping``,
``mappings.read_sql_batch``, ``mappings.land_for_replay``) and the simulator (``simulate.simulate``).

docs/sources.md.
"""
