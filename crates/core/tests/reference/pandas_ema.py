#!/usr/bin/env python3
"""Writes ema.csv beside this script: pandas' EMA (ewm(span, adjust=False)
.mean()) of each symbol's first 500 prices in data/trades.csv, in file order, for a
few spans, plus a synthetic sequence made to tell near-equivalent formulas
apart (constant runs, jumps of many orders of magnitude, repeating
decimals). Run from the repository root with pandas installed:

    python3 crates/core/tests/reference/pandas_ema.py

The output is committed, so `cargo test` compares against it bit for bit
without Python. Values are Python reprs: shortest round-trip decimals."""

import csv
import os
import random

import pandas as pd

SPANS = [2, 5, 20, 50]
HERE = os.path.dirname(os.path.abspath(__file__))


def synthetic():
    rng = random.Random(7)
    # A first price repeated: pandas keeps the average where it is when the
    # price equals it, where (old * y + alpha * y) / 1 would move it.
    prices = [339.23896044506176] * 4 + [915.9448117309811] * 3
    while len(prices) < 400:
        kind = rng.random()
        if kind < 0.3:
            # A constant run, long enough for the average to reach the price.
            prices.extend([prices[-1]] * rng.randint(1, 80))
        elif kind < 0.4:
            prices.append(rng.choice([1e-9, 1e12, 0.1, 0.3, 1 / 3, 123456789.123456]))
        else:
            prices.append(round(rng.uniform(0.01, 500.0), rng.randint(0, 6)))
    return prices


def main() -> None:
    series = {}
    with open("data/trades.csv") as f:
        for row in csv.DictReader(f):
            prices = series.setdefault(row["symbol"], [])
            if len(prices) < 500:
                prices.append(float(row["price"]))
    series["SYNTH"] = synthetic()
    with open(os.path.join(HERE, "ema.csv"), "w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["symbol", "span", "price", "ema"])
        for symbol, prices in series.items():
            for span in SPANS:
                emas = pd.Series(prices).ewm(span=span, adjust=False).mean()
                for price, ema in zip(prices, emas):
                    writer.writerow([symbol, span, repr(price), repr(float(ema))])


if __name__ == "__main__":
    main()
