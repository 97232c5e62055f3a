"""Old path of ``tools/ptx_resources.py`` (the Triton kernel compiled for sm_90, its registers and
spills), kept for callers of this path; it runs that script with the same arguments."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    tool = Path(__file__).resolve().parents[1] / "tools" / "ptx_resources.py"
    runpy.run_path(str(tool), run_name="__main__")
