"""`python -m cluster.k8s render|validate|fetch-weights ...` (the pods' init containers run `fetch-weights`)."""
import sys

from cluster.k8s.cli import main

if __name__ == "__main__":
    sys.exit(main())
