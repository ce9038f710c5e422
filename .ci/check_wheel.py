"""sdmerge for a ViT user: ``import sdmerge``, ``apply`` / ``remove`` on a tiny transformers ViT
(random weights), its merge groups by ``sdmerge.plan_recording`` and ``sdmerge.visualize`` (modules
loaded on first use), and diffusers is never imported.

CI runs it in an environment that holds only the built wheel and its dependencies
(``python .ci/check_wheel.py --installed``: sdmerge must come from site-packages, not the
checkout); ``tests/test_vit.py`` runs it against the checkout.
"""

import argparse
import sys

import torch

import sdmerge

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--installed", action="store_true", help="sdmerge must be the installed package")
args = parser.parse_args()
if args.installed and "site-packages" not in sdmerge.__file__:
    sys.exit(f"sdmerge was imported from {sdmerge.__file__}, not from the installed wheel")
assert "diffusers" not in sys.modules and "transformers" not in sys.modules, "import sdmerge loaded a model library"

from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

torch.manual_seed(0)
config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=64, num_labels=10)
model = ViTForImageClassification(config).eval()
pixel_values = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    before = model(pixel_values).logits
    sdmerge.apply(model, "tome", tokens_per_block=2)  # 16 patches + class token: 17 -> 9 tokens after 4 blocks
    merged = model(pixel_values).logits
    sizes = sdmerge.vit.reduction_state(model).sizes
    plan = sdmerge.plan_recording.vit_provenance_after(model, pixel_values, block=1)  # 17 -> 15 -> 13 tokens
    picture = sdmerge.visualize.paint_groups(torch.rand(3, 32, 32), sdmerge.visualize.token_labels(plan, 1)[0], (4, 4))
    sdmerge.remove(model)
    after = model(pixel_values).logits
assert sizes.shape == (2, 9) and sizes.sum(dim=1).tolist() == [17, 17], sizes
assert plan.num_groups == 13 and picture.shape == (3, 32, 32)
assert not torch.equal(merged, before) and torch.equal(after, before)
try:
    sdmerge.apply(torch.nn.Linear(2, 2))
except TypeError as error:
    message = str(error)
else:
    sys.exit("sdmerge.apply(torch.nn.Linear) did not raise TypeError")
assert "diffusers" not in sys.modules, "a ViT's apply imported diffusers"
print(f"sdmerge {sdmerge.__version__} from {sdmerge.__file__}: tome on a tiny ViT, 17 -> 9 tokens, its groups "
      "recorded and painted, remove restores the logits; diffusers not imported")
print(message)
