"""backend="turbo" works without importing turbo_fx: the torch_dynamo_backends entry point."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

SCRIPT = """
import sys, torch
from torch import nn
assert "turbo_fx" not in sys.modules
assert "turbo" in torch._dynamo.list_backends()
layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
x = torch.randn(2, 9, 16)
with torch.no_grad():
    out = torch.compile(layer, backend="turbo", options={"r": 2, "inner_backend": "eager"})(x)
print("imported" if "turbo_fx" in sys.modules else "missing", tuple(out.shape))
"""


def test_entry_point_is_registered():
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("turbo") == "turbo_fx.backend:turbo_backend"


def test_backend_name_works_without_import():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["imported", "(2,", "9,"] or "imported (2, 9, 16)" in result.stdout
