"""Layering: plain modules never import Lightning; only the Lightning wrappers do.

Every module of the package is imported in a fresh interpreter in which ``lightning`` and
``pytorch_lightning`` cannot be imported. The modules listed in ``LIGHTNING_MODULES`` are the
only ones allowed to need it; a new module is plain unless added there.
"""

import subprocess
import sys
import textwrap

LIGHTNING_MODULES = {
    "captioner.__main__", "captioner.cli", "captioner.data.cached", "captioner.data.datamodule",
    "captioner.data.parallel", "captioner.lit", "captioner.lit.base", "captioner.lit.captioning",
    "captioner.lit.callbacks", "captioner.lit.checkpoint_io", "captioner.lit.loggers",
    "captioner.lit.optim",
    "captioner.lit.translation",
}


def test_plain_modules_import_without_lightning():
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        sys.modules["lightning"] = None  # any import of it raises ImportError
        sys.modules["pytorch_lightning"] = None
        import captioner
        allowed = {sorted(LIGHTNING_MODULES)!r}
        names = sorted(m.name for m in pkgutil.walk_packages(captioner.__path__, "captioner."))
        failed = []
        for name in names:
            if name in allowed:
                continue
            try:
                importlib.import_module(name)
            except ImportError as e:
                failed.append(f"{{name}}: {{e}}")
        print(len(names))
        print("\\n".join(failed))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    count, *failed = proc.stdout.strip().split("\n")
    assert int(count) > 30  # the walk found the package
    assert [f for f in failed if f] == [], "plain modules that import Lightning"


def test_inference_does_not_import_torchvision():
    """Captioning from a checkpoint starts without torchvision (about 2 s of imports, which
    pulls in torch._dynamo): only the torchvision backbones import it, when they are built."""
    script = ("import sys, captioner.inference, captioner.evaluation, captioner.commands\n"
              "print('torchvision' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
