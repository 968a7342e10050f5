"""Adapters that run secure_fl's round layer inside other federated-learning engines.

* :mod:`secure_fl.integrations.flower` -- Flower (Message API): a ServerApp workflow and a
  ClientApp mod (the optional extra ``secure_fl[flower]``).
"""
