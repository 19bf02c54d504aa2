"""The openYuanrong actors of the App: Router, Prefill, Decode and WeightCache.

Each actor is a thin shell over a library class in ``app/`` that holds the logic and is tested on its
own; the shells only make that class a yr actor.
"""
