"""`python tests/run_with_faults.py FAULTS_JSON <maria args>`: the maria CLI with tests/faults.py's
Faults injected into extraction (for tests whose job runs in another process)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from faults import Faults  # noqa: E402

from maria_app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], hooks=Faults(**json.loads(sys.argv[1]))))
