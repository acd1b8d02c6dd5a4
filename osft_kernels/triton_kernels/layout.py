"""The column layouts the Triton kernels read and write, as Triton constants taken from the Python
side: the row statistics of :mod:`osft_kernels.row_stats` and the block partials of
:mod:`osft_kernels.driver`."""
import triton.language as tl

from .. import driver, row_stats

LSE = tl.constexpr(row_stats.LSE)
TARGET_LOGIT = tl.constexpr(row_stats.TARGET_LOGIT)
MEAN_LOGIT = tl.constexpr(row_stats.MEAN_LOGIT)
ENTROPY_STAT = tl.constexpr(row_stats.ENTROPY)
MAX_LOGIT = tl.constexpr(row_stats.MAX_LOGIT)
SQUARE_LSE = tl.constexpr(row_stats.SQUARE_LSE)

PARTIAL_MAX = tl.constexpr(driver.PARTIAL_MAX)
PARTIAL_SUM = tl.constexpr(driver.PARTIAL_SUM)
PARTIAL_ENTROPY = tl.constexpr(driver.PARTIAL_ENTROPY)
PARTIAL_LOGIT_SUM = tl.constexpr(driver.PARTIAL_LOGIT_SUM)
PARTIAL_SQUARE_SUM = tl.constexpr(driver.PARTIAL_SQUARE_SUM)
