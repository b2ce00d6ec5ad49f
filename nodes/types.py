"""The custom socket types our nodes exchange (V3 ``io.Custom``)."""

from comfy_api.latest import io

ExpressionAdapterType = io.Custom("EXPRESSION_ADAPTER")
FlameExpressionType = io.Custom("FLAME_EXPRESSION")
