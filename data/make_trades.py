#!/usr/bin/env python3
"""Writes data/trades.csv: a deterministic sample of trades with volumes and
realistic event times (two hours of a session from 2026-12-01 14:30 UTC, gaps
of 5 ms to 4 s, a few quotes out of ts order), for four symbols: three stocks
priced in cents and traded in lots, and one crypto pair priced to the cent
with volumes to eight places. Run it from the repository root; the output is
committed, so nothing needs Python."""

import csv
import random

START_MS = 1_764_599_400_000  # 2026-12-01T14:30:00Z
SYMBOLS = {
    # symbol: (first price, volatility per trade, volume maker)
    "AAPL": (189.37, 0.04, lambda r: r.choice([100, 100, 200, 300, 500, 1000, 37])),
    "MSFT": (411.72, 0.09, lambda r: r.choice([100, 100, 200, 400, 25])),
    "NVDA": (121.87, 0.05, lambda r: r.choice([100, 200, 300, 1000, 2500, 5])),
    "BTC-USD": (97_250.10, 9.0, lambda r: round(r.uniform(0.0001, 1.5), 8)),
}


def main() -> None:
    rng = random.Random(20261201)
    prices = {symbol: first for symbol, (first, _, _) in SYMBOLS.items()}
    clock = START_MS
    rows = []
    while clock < START_MS + 2 * 3600 * 1000 and len(rows) < 6000:
        clock += rng.choice([5, 20, 80, 250, 700, 1500, 4000])
        symbol = rng.choice(list(SYMBOLS))
        _, step, volume = SYMBOLS[symbol]
        prices[symbol] = max(0.01, prices[symbol] + rng.gauss(0, step))
        ts = clock
        if rng.random() < 0.01:
            ts -= rng.randint(1, 3000)  # a late report
        rows.append((symbol, f"{prices[symbol]:.2f}", volume(rng), ts))
    with open("data/trades.csv", "w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["symbol", "price", "volume", "ts"])
        for symbol, price, vol, ts in rows:
            writer.writerow([symbol, price, f"{vol:.8f}".rstrip("0").rstrip(".") if isinstance(vol, float) else vol, ts])


if __name__ == "__main__":
    main()
