#!/bin/sh
# GPU memory, utilization, temperature and power for node_exporter's textfile collector (llamadeploy).
# Run by llamadeploy-gpu-metrics.timer. nvidia-smi's answer is turned into the exposition format and
# renamed into place, so the exporter never reads a half-written file; when nvidia-smi fails (a driver
# gone after an update, the GPU fallen off the bus) the file says so: llamadeploy_gpu_up 0.
set -u
dir=${1:-/var/lib/prometheus/node-exporter}
out="$dir/llamadeploy_gpu.prom"
tmp="$dir/.llamadeploy_gpu.prom.$$"  # not *.prom: the collector reads only those
trap 'rm -f "$tmp"' EXIT
trap 'exit 1' INT TERM  # dash runs the EXIT trap only on exit: a stopped run leaves no staging file
# a hung nvidia-smi (a GPU fallen off the bus) is killed; one that cannot be killed leaves the file
# unrefreshed, which LlamaGpuMetricsStale reports
csv=$(timeout -k 5 20 nvidia-smi --query-gpu=index,uuid,name,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw \
      --format=csv,nounits 2>/dev/null)
rc=$?
printf '%s\n' "$csv" | awk -F', ' -v rc="$rc" '
function num(v) { return v ~ /^[0-9]+([.][0-9]+)?$/ }  # "[N/A]", "[Not Supported]": no sample
function esc(v) { gsub(/[^A-Za-z0-9 ._:()-]/, "_", v); return v }  # label values: no quote, no backslash
function put(metric, i, v, fmt, scale) {  # nvidia-smi prints MiB and percent: bytes and ratios here
  if (num(v)) { n[metric]++; s[metric] = s[metric] metric labels[i] " " sprintf(fmt, v * scale) "\n" }
}
NR == 1 || rc != 0 || NF < 8 { next }
{
  i++; labels[i] = "{gpu=\"" esc($1) "\",uuid=\"" esc($2) "\",name=\"" esc($3) "\"}"
  put("llamadeploy_gpu_memory_used_bytes", i, $4, "%.0f", 1048576)
  put("llamadeploy_gpu_memory_total_bytes", i, $5, "%.0f", 1048576)
  put("llamadeploy_gpu_utilization_ratio", i, $6, "%.2f", 0.01)
  put("llamadeploy_gpu_temperature_celsius", i, $7, "%g", 1)
  put("llamadeploy_gpu_power_watts", i, $8, "%g", 1)
}
END {
  help["llamadeploy_gpu_up"] = "1 if nvidia-smi answered the last query, 0 if it failed (no driver, GPU lost)."
  help["llamadeploy_gpu_memory_used_bytes"] = "GPU memory in use (nvidia-smi memory.used)."
  help["llamadeploy_gpu_memory_total_bytes"] = "GPU memory in all (nvidia-smi memory.total)."
  help["llamadeploy_gpu_utilization_ratio"] = "Share of the last sample period a kernel ran (nvidia-smi utilization.gpu / 100)."
  help["llamadeploy_gpu_temperature_celsius"] = "GPU core temperature (nvidia-smi temperature.gpu)."
  help["llamadeploy_gpu_power_watts"] = "Board power draw (nvidia-smi power.draw)."
  printf "# HELP llamadeploy_gpu_up %s\n# TYPE llamadeploy_gpu_up gauge\nllamadeploy_gpu_up %d\n", help["llamadeploy_gpu_up"], (rc == 0 && i > 0)
  split("llamadeploy_gpu_memory_used_bytes llamadeploy_gpu_memory_total_bytes llamadeploy_gpu_utilization_ratio llamadeploy_gpu_temperature_celsius llamadeploy_gpu_power_watts", order, " ")
  for (k = 1; k <= 5; k++) if (n[order[k]]) printf "# HELP %s %s\n# TYPE %s gauge\n%s", order[k], help[order[k]], order[k], s[order[k]]
}' > "$tmp" && chmod 644 "$tmp" && mv -f "$tmp" "$out"
