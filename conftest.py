"""Suite-wide pytest set-up (applies to tests/ and to the docstring examples in ctxpred/).

The tests use tiny tensors, for which intra-op threads only add synchronization cost (and on a
shared 2-core machine, contention): every test runs with one torch thread.
"""

import torch

torch.set_num_threads(1)
