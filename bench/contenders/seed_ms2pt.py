"""The seed's conversion, step for step: MindSpore load_checkpoint, names paired by list position, torch.save.

The seed script (MindONE ``examples/stable_diffusion_xl/tools/lora_conversion/convert_lora_ms2pt.py``)
reads two name lists (``name#shape#dtype`` per line, MindSpore names in file order and diffusers
names in the same order), loads the whole checkpoint with ``mindspore.load_checkpoint``, copies each
tensor with ``torch.tensor(parameter.asnumpy())`` under the name at the same line of the other list
(no shape check, no alpha) and pickles the dict with ``torch.save``. Only its ``fire`` command-line
wrapper is left out (positional arguments instead).

One guard is switched off: MindSpore 2.10's ``load_checkpoint`` (newer than the seed) refuses a
``.ckpt`` larger than the machine's *free* memory (``SC_AVPHYS_PAGES``, which does not count
reclaimable page cache), so on a machine whose page cache is full it refuses even a 700 MB file.
Without the guard it does what the seed relied on: read the whole file and parse it as one message.

    python bench/contenders/seed_ms2pt.py lora.ckpt ms_lora_params.txt pt_lora_params_ordered.txt lora_pt.ckpt
"""

import sys

import mindspore as ms
import torch
from mindspore.train import serialization

serialization._check_checkpoint_protobuf_size = lambda *args, **kwargs: None  # see the module docstring


def main(ms_ckpt: str, ms_plist: str, pt_plist: str, pt_ckpt_save_path: str) -> None:
    with open(ms_plist) as fp_ms:
        ms_names = fp_ms.readlines()
    with open(pt_plist) as fp_pt:
        pt_names = fp_pt.readlines()
    ms_state_dict = ms.load_checkpoint(ms_ckpt)
    pt_state_dict = {}
    for line_ms, line_pt in zip(ms_names, pt_names):  # pairing by position, as the seed does
        pt_state_dict[line_pt.split("#")[0]] = torch.tensor(ms_state_dict[line_ms.split("#")[0]].asnumpy())
    torch.save(pt_state_dict, pt_ckpt_save_path)


if __name__ == "__main__":
    main(*sys.argv[1:5])
