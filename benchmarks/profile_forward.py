"""Where a sampling forward of the poster's UNet spends its time (batch 256, CPU, inference_mode).

    python benchmarks/profile_forward.py

Prints torch.profiler's table of operators by self CPU time (see benchmarks/README.md).
"""

import torch
from torch.profiler import profile, ProfilerActivity
from ddpmkit import UNet
torch.manual_seed(0)
m = UNet(base_channels=64, channel_mults=(1,2,2), num_res_blocks=2, attention_levels=(1,)).eval()
x = torch.randn(256,1,28,28); t = torch.randint(0,1000,(256,))
with torch.inference_mode():
    m(x,t)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        m(x,t)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
