// Shows what the FastVAR Sampler ran (size, pruning, timing) on the node itself after each run.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "fastvar.samplerInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "FastVAR_Sampler") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const out = onExecuted?.apply(this, arguments);
      const text = message?.fastvar_info?.join("\n");
      if (!text) return out;
      if (!this.fastvarInfo) {
        const box = document.createElement("div");
        box.style.cssText = "font: 11px monospace; color: #ccc; white-space: pre-wrap; padding: 2px 4px;";
        const widget = this.addDOMWidget("run_info", "fastvar_info", box, {
          serialize: false,
          getValue: () => undefined,
          setValue: () => {},
          getMinHeight: () => 32,
        });
        widget.serialize = false;
        widget.options = widget.options || {};
        widget.options.serialize = false;
        this.fastvarInfo = box;
      }
      this.fastvarInfo.textContent = text;
      this.setDirtyCanvas(true, true);
      return out;
    };
  },
});
