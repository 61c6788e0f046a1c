"""kdlab.viz: what the notebooks' figures are drawn with."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdlab.viz import show_image  # noqa: E402


def test_show_image_muted_is_quantised_mid_grey():
    image = torch.zeros(3, 2, 2)
    image[:, 0, 0] = 1.0                      # white
    image[:, 1, 1] = torch.tensor([1.0, 0.0, 0.5])  # luminance (mean) 0.5
    fig, ax = plt.subplots()
    show_image(ax, image, "t", muted=True)
    shown = ax.get_images()[0]
    grey = np.asarray(shown.get_array())
    # 0.3 + 0.5 * mean, rounded to 32 levels: white -> 0.8 -> 26/32, black -> 0.3 -> 10/32, 0.5 -> 0.55 -> 18/32
    assert grey.shape == (2, 2)
    np.testing.assert_allclose(grey, [[26 / 32, 10 / 32], [10 / 32, 18 / 32]])
    assert shown.get_cmap().name == "gray" and shown.get_clim() == (0.0, 1.0)
    assert ax.get_title() == "t" and not ax.axison
    plt.close(fig)


def test_show_image_plain_keeps_the_colours():
    image = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    fig, ax = plt.subplots()
    show_image(ax, image)
    np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()), image.permute(1, 2, 0).numpy(), atol=1e-6)
    plt.close(fig)
