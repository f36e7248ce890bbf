"""Marketing segments from YAML rules, their exports and uplift (``rules.publish_segments``) and
campaign delivery (``delivery.deliver_events``). docs/segments.md.
"""
