"""Self-evolving modules: user feedback becomes the next version of a LoRA module, under guards.

- ``feedback``: the durable feedback log (rate limit per principal, typed refusals, decisions);
- ``weighting``: the poison guards (one vote per principal and prompt, trust from agreement,
  validation facts win);
- ``validation``: the module's own validation set (the facts it was made to hold);
- ``objective``: DPO + SFT + replay training of a candidate from the current version's factors;
- ``evolver``: ``Evolver.step`` — regression check / rollback, train, validate, promote or discard.
"""
