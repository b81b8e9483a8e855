"""Adapters for outside frameworks, one module each, imported as ``rewardplug.integrations.<name>``.

The core (``rewardplug``) never imports these.
"""
