"""The probe inside the Hugging Face ``Trainer``: a small BERT built from a config (no download) learns a toy
token task; ``ProbeCallback`` measures a fixed padded batch — keyword inputs, ``.logits`` output — every 5 steps
and appends the summaries to ``trainer.state.log_history``.

Requires: transformers, accelerate   (pip install optmech[transformers])
Run: python examples/hf_trainer_callback.py
"""

import os
import tempfile

import torch
import transformers

from optmech.integrations.transformers import ProbeCallback

torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16, num_labels=3)
model = transformers.BertForSequenceClassification(config)

# toy task: the label is which of three token ranges is most frequent; variable lengths, padded with 0
n, T = 256, 12
ids = torch.randint(1, 50, (n, T))
lengths = torch.randint(4, T + 1, (n,))
mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
ids = ids * mask
labels = torch.stack([((ids >= lo) & (ids < lo + 17) & (mask > 0)).sum(1) for lo in (1, 18, 35)], 1).argmax(1)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return n - 16

    def __getitem__(self, i):
        i += 16
        return {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}


callback = ProbeCallback(({"input_ids": ids[:16], "attention_mask": mask[:16]}, labels[:16]), every_n_steps=5)
out = os.environ.get("OPTMECH_EXAMPLES_OUT") or tempfile.mkdtemp()
args = transformers.TrainingArguments(output_dir=os.path.join(out, "hf_trainer"), max_steps=30, per_device_train_batch_size=16,
                                      learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=10,
                                      disable_tqdm=True)
trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
trainer.train()
print("step  median log2 E_f      U        L   Theorem 3 holds")
for entry in trainer.state.log_history:
    if "optmech/probe/U/median" in entry:
        print(f"{entry['step']:4d}  {entry['optmech/probe/log_fitting_error/median']:15.3f}  {entry['optmech/probe/U/median']:6.3f}  "
              f"{entry['optmech/probe/L/median']:7.3f}   {100 * entry['optmech/probe/bound_holds_fraction']:.0f} %")
print("route:", "every parameter on the fast path" if not callback._probe.route.generic() else callback._probe.route.generic())
