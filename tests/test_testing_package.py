"""cantata.testing ships the contract suites without making pytest a dependency."""

from __future__ import annotations

import subprocess
import sys


def test_cantata_and_its_testing_module_never_import_pytest() -> None:
    code = (
        "import sys, cantata, cantata.testing, cantata.store.sqlite, cantata.broker.embedded\n"
        "print(sorted(m for m in ('pytest', 'hypothesis', 'pytest_asyncio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_contract_suites_are_importable_from_the_package() -> None:
    from cantata.testing.contract import BrokerContract, StoreContract

    assert not StoreContract.__name__.startswith("Test")  # collected only through subclasses
    assert hasattr(StoreContract, "make_store") and hasattr(BrokerContract, "create_broker")
