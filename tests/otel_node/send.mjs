// One agent trace through OpenTelemetry's JavaScript SDK and its OTLP/HTTP exporter, which
// sends OTLP JSON. The exporter is configured by the OTEL_EXPORTER_OTLP_* variables alone
// (endpoint, headers, compression), as an unchanged Node app's would be. Prints the trace id.
import { context, trace, SpanKind, SpanStatusCode } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BasicTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";

const exporter = new OTLPTraceExporter();
const results = [];
const recording = {
  export(spans, done) {
    exporter.export(spans, (result) => {
      results.push(result.code);
      if (result.error) console.error(`export failed: ${result.error.message ?? result.error}`);
      done(result);
    });
  },
  shutdown: () => exporter.shutdown(),
  forceFlush: () => exporter.forceFlush(),
};
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({
    "service.name": "checkout",
    "deployment.environment.name": "staging",
  }),
  spanProcessors: [new SimpleSpanProcessor(recording)],
});
const tracer = provider.getTracer("my.agent", "0.3.0");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const root = tracer.startSpan("handle request");
const inRoot = trace.setSpan(context.active(), root);
const llm = tracer.startSpan("chat gpt-4o", { kind: SpanKind.CLIENT }, inRoot);
llm.setAttributes({
  "gen_ai.operation.name": "chat",
  "gen_ai.provider.name": "openai",
  "gen_ai.request.model": "gpt-4o",
  "gen_ai.usage.input_tokens": 1000,
  "gen_ai.usage.output_tokens": 100,
  "user.id": "alice",
});
await sleep(10);
llm.end();
const tool = tracer.startSpan(
  "execute_tool weather",
  {
    attributes: {
      "gen_ai.operation.name": "execute_tool",
      "gen_ai.tool.name": "weather",
      "gen_ai.tool.call.arguments": '{"city": "Paris"}',
    },
  },
  inRoot,
);
tool.end();
const db = tracer.startSpan("SELECT orders", {}, inRoot);
db.recordException(new Error("the database timed out"));
db.setStatus({ code: SpanStatusCode.ERROR, message: "the database timed out" });
db.end();
root.end();
await provider.forceFlush();
await provider.shutdown();
console.log(`trace ${root.spanContext().traceId}`);
console.log(`results ${results.join(",")}`);
