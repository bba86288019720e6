"""Where a domain's tokens went: trained, distinct, cut at the sequence ends, unused.

A stream of ``tokens_in`` tokens is walked as :class:`hone.train.data.TokenStream` walks it:
windows of ``seq_len + 1`` tokens (inputs and shifted targets) starting at 0, ``seq_len``,
``2 * seq_len`` ... while one still fits, then again from 0 (the next epoch). A pass therefore
takes ``W = (tokens_in - 1) // seq_len`` windows and reaches the first ``W * seq_len + 1``
tokens; the rest, fewer than ``seq_len``, is cut in every pass. Pure arithmetic on the
stream's state ``(pos, epoch)``: the position of the next window and the passes completed.
"""

from __future__ import annotations

from hone.errors import HoneError


def token_ledger(tokens_in: int, seq_len: int, pos: int, epoch: int) -> dict:
    """Counts of a stream of ``tokens_in`` tokens after the loader reached ``(pos, epoch)``.

    ``trained``: tokens trained on, counting repeats (``seq_len`` targets per window);
    ``distinct``: tokens that were in some window at least once; ``cut``: the tail no pass reaches;
    ``unused``: tokens the current first pass has not reached yet. Always
    ``tokens_in == distinct + cut + unused``.
    """
    tokens_in, seq_len, pos, epoch = int(tokens_in), int(seq_len), int(pos), int(epoch)
    if seq_len < 1 or tokens_in < seq_len + 1:
        raise HoneError(f"a stream of {tokens_in} tokens holds no window of seq_len {seq_len} + 1")
    per_pass = (tokens_in - 1) // seq_len
    if epoch < 0 or pos < 0 or pos % seq_len or pos > per_pass * seq_len:
        raise HoneError(f"loader state pos {pos}, epoch {epoch} is not a window start of a stream of "
                        f"{tokens_in} tokens at seq_len {seq_len} (0, {seq_len}, ... {per_pass * seq_len})")
    windows = epoch * per_pass + pos // seq_len
    reach = per_pass * seq_len + 1  # what one whole pass puts in some window
    distinct = reach if windows >= per_pass else (windows * seq_len + 1 if windows else 0)
    cut = tokens_in - reach
    return {"tokens_in": tokens_in, "seq_len": seq_len, "windows": windows, "windows_per_pass": per_pass,
            "passes": windows / per_pass, "trained": windows * seq_len, "distinct": distinct, "cut": cut,
            "unused": tokens_in - distinct - cut}
