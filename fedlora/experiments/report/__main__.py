"""``python -m fedlora.experiments.report RESULTS_DIR`` (what ``fedlora report`` runs)."""

import sys

from fedlora.experiments.report import main

sys.exit(main())
