"""TLS certificates and SuperNode keys for a real deployment: see fedapp/tools/deploy.py.

    python scripts/deploy/credentials.py tls --out certs --host flower.example.org
    python scripts/deploy/credentials.py node-key --out keys/supernode-0
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedapp.tools.deploy import main

if __name__ == "__main__":
    sys.exit(main())
