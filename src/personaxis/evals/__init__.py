"""Evaluations of the paper's claims on any model: steering sweep, persona drift and what predicts it, persona
jailbreaks with capping, a capability guard, a capping sweep, and the results page (``personaxis eval ...``).

Each evaluation generates answers in large batches, labels them (a judge, or code), and writes one JSON record with
its raw labelled items and the metrics computed from them (:mod:`personaxis.evals.record`).
"""
