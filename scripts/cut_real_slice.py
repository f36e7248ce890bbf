"""Cut the real-data regression fixture from the UCI "Online Retail" order lines.

Keeps every order line of the customers whose ``md5(CustomerID)`` falls in one
``--customer-modulus``-th of the hash space, plus the lines of one ``--guest-modulus``-th of
the guest invoices (no CustomerID, by ``md5(InvoiceNo)``), with ``InvoiceDate`` in
``[--start, --end)``. Cancellations (``C`` invoices) of the kept customers stay in. The
header is renamed to the "Online Retail II" names the shipped ``order_lines`` mapping reads
(``InvoiceNo`` -> ``Invoice``, ``UnitPrice`` -> ``Price``, ``CustomerID`` -> ``Customer ID``);
no value is changed and the rows keep the source's order. The output is gzip with a fixed
header time, so the same input and options give the same bytes.

Usage (from the repository root; the defaults cut ``tests/fixtures/real/``)::

    .venv/bin/python scripts/cut_real_slice.py PATH/online-retail-dataset.csv
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import sys
from pathlib import Path

RENAMED = {"InvoiceNo": "Invoice", "UnitPrice": "Price", "CustomerID": "Customer ID"}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real" / "online_retail_slice.csv.gz"


def in_share(key: str, modulus: int) -> bool:
    """Whether ``key`` falls in one ``modulus``-th of the md5 hash space (stable across runs and machines)."""
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % modulus == 0


def cut(source: Path, out: Path, start: str, end: str, customer_modulus: int, guest_modulus: int) -> dict[str, int]:
    """Write the slice to ``out`` (gzip CSV) and return its shape."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    counts = {"lines": 0, "customers": 0, "cancellation_lines": 0, "guest_lines": 0, "invoices": 0}
    customers: set[str] = set()
    invoices: set[str] = set()
    with source.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        writer.writerow([RENAMED.get(name, name) for name in header])
        invoice, date, customer = (header.index(c) for c in ("InvoiceNo", "InvoiceDate", "CustomerID"))
        for row in reader:
            if not start <= row[date] < end:
                continue
            who = row[customer].strip()
            if not (in_share(who, customer_modulus) if who else in_share(row[invoice], guest_modulus)):
                continue
            writer.writerow(row)
            counts["lines"] += 1
            counts["cancellation_lines"] += row[invoice].startswith("C")
            counts["guest_lines"] += not who
            invoices.add(row[invoice])
            if who:
                customers.add(who)
    counts["customers"], counts["invoices"] = len(customers), len(invoices)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(text.getvalue().encode("utf-8"))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="online-retail-dataset.csv (UCI Online Retail, 541,909 lines)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--start", default="2011-11-01", help="first InvoiceDate kept (ISO text, inclusive)")
    parser.add_argument("--end", default="2011-11-21", help="InvoiceDate bound (ISO text, exclusive)")
    parser.add_argument("--customer-modulus", type=int, default=3, help="keep 1/N of the customers")
    parser.add_argument("--guest-modulus", type=int, default=40, help="keep 1/N of the guest invoices")
    args = parser.parse_args(argv)
    counts = cut(args.source, args.out, args.start, args.end, args.customer_modulus, args.guest_modulus)
    print({**counts, "bytes": args.out.stat().st_size, "out": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
