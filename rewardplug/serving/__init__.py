"""Serving: the replica (a RewardModel and its RewardEngine) as a Ray Serve deployment, with two doors
to it: the Python pool handle (``RewardPool``) and the HTTP door (``HttpDoor``, an ingress deployment).
Built on the engine; never imported by it.
"""
