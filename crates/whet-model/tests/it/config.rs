//! config.json parsing for the supported families, rope frequencies, and config errors.

use std::path::Path;

use whet_model::{Config, Error, LayerAttention, ModelType, RopeKind};

fn parse(json: &str) -> whet_model::Result<Config> {
    Config::from_json_str(json, Path::new("/models/x/config.json"))
}

const SMOLLM2_135M: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
  "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
  "is_llama_config": true, "max_position_embeddings": 8192, "model_type": "llama",
  "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": false, "rope_scaling": null,
  "rope_theta": 100000, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1", "use_cache": true, "vocab_size": 49152
}"#;

const LLAMA31_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
  "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": false,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "vocab_size": 128256
}"#;

const QWEN2_05B: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
  "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
  "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_cache": true,
  "use_sliding_window": false, "vocab_size": 151936
}"#;

const MISTRAL_7B: &str = r#"{
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
  "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
  "vocab_size": 32000
}"#;

#[test]
fn real_configs_parse() {
    let c = parse(SMOLLM2_135M).unwrap();
    assert_eq!(c.model_type(), ModelType::Llama);
    assert_eq!((c.head_dim(), c.num_kv_heads()), (64, 3));
    assert!(c.tie_word_embeddings && !c.qkv_bias() && !c.o_bias());
    assert_eq!(c.rope_base(), 100000.0);
    assert_eq!(c.eos_token_ids(), vec![0]);

    let c = parse(LLAMA31_8B).unwrap();
    assert_eq!(c.eos_token_ids(), vec![128001, 128008, 128009]);
    assert!(matches!(
        c.rope_kind(),
        RopeKind::Llama3 {
            original_max_position_embeddings: 8192,
            ..
        }
    ));

    let c = parse(QWEN2_05B).unwrap();
    assert_eq!(c.model_type(), ModelType::Qwen2);
    assert!(c.qkv_bias() && !c.o_bias(), "Qwen2: bias on q/k/v only");
    assert_eq!(c.head_dim(), 64);

    let c = parse(MISTRAL_7B).unwrap();
    assert_eq!(c.model_type(), ModelType::Mistral);
    assert_eq!(c.sliding_window, Some(4096));
    assert!(!c.qkv_bias());

    // A config with explicit head_dim (Qwen3-style) and no num_key_value_heads.
    let c = parse(
        r#"{"model_type":"llama","vocab_size":10,"hidden_size":16,"intermediate_size":8,
        "num_hidden_layers":1,"num_attention_heads":2,"head_dim":12}"#,
    )
    .unwrap();
    assert_eq!((c.head_dim(), c.num_kv_heads()), (12, 2));
    assert_eq!(c.inv_freq().len(), 6);

    // transformers >= 5 writes theta and rope type under rope_parameters.
    let v5 = LLAMA31_8B
        .replace("\"rope_theta\": 500000.0,", "")
        .replace("\"rope_scaling\"", "\"rope_parameters\"")
        .replace(
            "\"rope_type\": \"llama3\"",
            "\"rope_type\": \"llama3\", \"rope_theta\": 500000.0",
        );
    let c5 = parse(&v5).unwrap();
    assert_eq!(c5.rope_base(), 500000.0);
    assert_eq!(c5.inv_freq(), parse(LLAMA31_8B).unwrap().inv_freq());
}

/// HF `_compute_default_rope_parameters` and `_compute_llama3_parameters`, in f64.
fn reference_inv_freq(theta: f64, dim: usize, llama3: Option<(f64, f64, f64, f64)>) -> Vec<f64> {
    let inv: Vec<f64> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f64 / dim as f64))
        .collect();
    let Some((factor, low, high, old)) = llama3 else {
        return inv;
    };
    inv.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < old / high {
                f
            } else if wavelen > old / low {
                f / factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

#[test]
fn inv_freq_matches_transformers_formulas() {
    for (json, llama3) in [
        (SMOLLM2_135M, None),
        (LLAMA31_8B, Some((8.0, 1.0, 4.0, 8192.0))),
    ] {
        let c = parse(json).unwrap();
        let got = c.inv_freq();
        let want = reference_inv_freq(c.rope_base(), c.head_dim(), llama3);
        assert_eq!(got.len(), c.head_dim() / 2);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).abs() / w)
            .fold(0.0, f64::max);
        eprintln!("inv_freq ({}): worst rel err {worst:.2e}", c.model_type);
        assert!(worst < 2e-6, "{worst}");
    }
    // llama3: the highest frequencies are untouched, the lowest divided by the factor, and
    // the band between is interpolated (strictly between the two).
    let c = parse(LLAMA31_8B).unwrap();
    let scaled = c.inv_freq();
    let plain = reference_inv_freq(500000.0, 128, None);
    assert_eq!(scaled[0] as f64, plain[0] as f32 as f64);
    assert!(((scaled[63] as f64) - plain[63] / 8.0).abs() / (plain[63] / 8.0) < 1e-5);
    let medium = (0..64).filter(|&i| {
        let (s, p) = (scaled[i] as f64, plain[i]);
        s < p * 0.9999 && s > p / 8.0 * 1.0001
    });
    assert!(medium.count() > 0);
}

fn field_error(json: &str) -> (String, String) {
    match parse(json) {
        Err(e @ Error::ConfigField { .. }) => {
            let Error::ConfigField { ref field, .. } = e else {
                unreachable!()
            };
            (field.clone(), e.to_string())
        }
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn config_errors_name_the_file_and_the_field() {
    // wrong type
    let (field, msg) =
        field_error(&SMOLLM2_135M.replace("\"hidden_size\": 576", "\"hidden_size\": \"576\""));
    assert_eq!(field, "hidden_size");
    assert!(
        msg.contains("/models/x/config.json") && msg.contains("line 3"),
        "{msg}"
    );
    let (field, _) = field_error(&LLAMA31_8B.replace("\"factor\": 8.0", "\"factor\": \"8\""));
    assert_eq!(field, "rope_scaling.factor");
    let (field, msg) = field_error(&LLAMA31_8B.replace("128008", "\"x\""));
    assert_eq!(field, "eos_token_id");
    assert!(msg.contains("config.json"), "{msg}");
    // unsupported rope type
    let (field, msg) = field_error(&LLAMA31_8B.replace("\"llama3\"", "\"yarn\""));
    assert_eq!(field, "rope_scaling");
    assert!(msg.contains("yarn") && msg.contains("llama3"), "{msg}");
    // missing llama3 parameter
    let (_, msg) = field_error(&LLAMA31_8B.replace("\"low_freq_factor\": 1.0,", ""));
    assert!(msg.contains("low_freq_factor"), "{msg}");
    // missing required field
    let (_, msg) = field_error(&MISTRAL_7B.replace("\"vocab_size\": 32000", "\"vocab\": 32000"));
    assert!(msg.contains("vocab_size"), "{msg}");
    // not JSON at all
    let (_, msg) = field_error("{\"model_type\": \"llama\",");
    assert!(
        msg.contains("config.json") && msg.contains("line 1"),
        "{msg}"
    );
}

#[test]
fn unsupported_architectures_and_features_are_refused() {
    let e = parse(&MISTRAL_7B.replace("\"mistral\"", "\"gpt2\"")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::UnsupportedModelType { .. }));
    assert!(
        msg.contains("/models/x/config.json") && msg.contains("gpt2"),
        "{msg}"
    );
    assert!(msg.contains("llama, mistral, qwen2"), "{msg}");

    let e = parse(&LLAMA31_8B.replace("\"mlp_bias\": false", "\"mlp_bias\": true")).unwrap_err();
    assert!(
        e.to_string().contains("mlp_bias") && e.to_string().contains("config.json"),
        "{e}"
    );
    let e = parse(&QWEN2_05B.replace("\"silu\"", "\"gelu\"")).unwrap_err();
    assert!(
        e.to_string().contains("hidden_act") && e.to_string().contains("gelu"),
        "{e}"
    );
    let e = parse(&MISTRAL_7B.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"))
        .unwrap_err();
    assert!(e.to_string().contains("num_key_value_heads"), "{e}");

    let missing = Config::from_file(Path::new("/nonexistent/whet/config.json")).unwrap_err();
    assert!(matches!(missing, Error::MissingFile { .. }), "{missing}");
    assert!(
        missing
            .to_string()
            .contains("/nonexistent/whet/config.json")
    );
}

#[test]
fn config_serializes_back_to_the_same_config() {
    for json in [
        SMOLLM2_135M,
        LLAMA31_8B,
        QWEN2_05B,
        MISTRAL_7B,
        QWEN3_06B,
        GEMMA3_270M,
    ] {
        let c = parse(json).unwrap();
        let again = parse(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
    }
    // transformers' Gemma3TextConfig takes only an int here.
    let text = serde_json::to_string(&parse(GEMMA3_270M).unwrap()).unwrap();
    assert!(text.contains(r#""query_pre_attn_scalar":256,"#), "{text}");
}

/// whet-fuzz found a 200-byte config.json (hidden_size 2^32, two heads) whose rope table
/// (`inv_freq`, head_dim / 2 floats) asked for 4 GiB; sizes are now bounded in `validate`.
#[test]
fn sizes_that_would_allocate_without_bound_are_rejected() {
    let base = r#""model_type": "llama", "vocab_size": 16, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;
    for (extra, field) in [
        (r#""hidden_size": 4294967296"#, "hidden_size"),
        (r#""hidden_size": 8, "head_dim": 4294967296"#, "head_dim"),
        (
            r#""hidden_size": 8, "max_position_embeddings": 1099511627776"#,
            "max_position_embeddings",
        ),
    ] {
        let text = format!("{{{base}, {extra}}}");
        let err = whet_model::Config::from_json_str(&text, std::path::Path::new("config.json"))
            .expect_err(extra)
            .to_string();
        assert!(
            err.contains(field) && err.contains("at most"),
            "{extra}: {err}"
        );
    }
}

/// Qwen3-0.6B's config.json as on the Hub (transformers 4.51).
const QWEN3_06B: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
  "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
  "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
  "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
}"#;

/// Gemma 3 270M's config.json as on the Hub (transformers 4.55): no `tie_word_embeddings`
/// (Gemma ties by default), `_sliding_window_pattern` beside `layer_types`.
const GEMMA3_270M: &str = r#"{
  "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"],
  "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": null,
  "bos_token_id": 2, "eos_token_id": 1, "final_logit_softcapping": null, "head_dim": 256,
  "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "initializer_range": 0.02,
  "intermediate_size": 2048,
  "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
    "sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
    "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
    "full_attention", "sliding_attention", "sliding_attention", "sliding_attention",
    "sliding_attention", "sliding_attention", "full_attention"],
  "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
  "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
  "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
  "rope_scaling": null, "rope_theta": 1000000.0, "sliding_window": 512,
  "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
  "use_bidirectional_attention": false, "use_cache": true, "vocab_size": 262144
}"#;

#[test]
fn qwen3_and_gemma3_configs_parse() {
    let c = parse(QWEN3_06B).unwrap();
    assert_eq!(c.model_type(), ModelType::Qwen3);
    assert!(c.qk_norm() && !c.qkv_bias() && !c.o_bias() && c.tie_word_embeddings);
    assert_eq!((c.head_dim(), c.num_kv_heads()), (128, 8));
    assert_eq!(c.attention_scale(), 1.0 / 128f64.sqrt());
    assert!((0..28).all(|i| c.layer_window(i).is_none()));

    let c = parse(GEMMA3_270M).unwrap();
    assert_eq!(c.model_type(), ModelType::Gemma3);
    assert!(
        c.is_gemma() && c.qk_norm() && c.tie_word_embeddings,
        "Gemma ties by default"
    );
    assert_eq!(c.attention_scale(), 1.0 / 16.0);
    let global: Vec<usize> = (0..18).filter(|&i| c.layer_window(i).is_none()).collect();
    assert_eq!(global, [5, 11, 17]);
    assert_eq!(c.layer_window(0), Some(512));
    assert_eq!(c.rope_base_for(LayerAttention::Full), 1e6);
    assert_eq!(c.rope_base_for(LayerAttention::Sliding), 1e4);
    let local = c.inv_freq_for(LayerAttention::Sliding);
    assert_eq!(local[1], 1.0 / 10000f32.powf(2.0 / 256.0));

    // The same pattern without layer_types: every 6th layer global.
    let mut v: serde_json::Value = serde_json::from_str(GEMMA3_270M).unwrap();
    v.as_object_mut().unwrap().remove("layer_types");
    let c2 = parse(&v.to_string()).unwrap();
    assert!((0..18).all(|i| c2.layer_window(i) == c.layer_window(i)));

    // transformers >= 5: rope_parameters per layer type.
    v["rope_parameters"] = serde_json::json!({
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    });
    let c5 = parse(&v.to_string()).unwrap();
    assert_eq!(c5.rope_kind(), RopeKind::Linear { factor: 8.0 });
    let scaled = c5.inv_freq_for(LayerAttention::Full);
    assert_eq!(scaled[1], c.inv_freq_for(LayerAttention::Full)[1] / 8.0);
    assert_eq!(c5.inv_freq_for(LayerAttention::Sliding), local);
}

#[test]
fn unsupported_gemma_and_window_settings_name_the_field() {
    let with = |key: &str, value: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(GEMMA3_270M).unwrap();
        v[key] = value;
        parse(&v.to_string()).unwrap_err().to_string()
    };
    for (key, value, says) in [
        (
            "final_logit_softcapping",
            serde_json::json!(30.0),
            "soft-capping",
        ),
        (
            "attn_logit_softcapping",
            serde_json::json!(50.0),
            "soft-capping",
        ),
        (
            "hidden_activation",
            serde_json::json!("gelu"),
            "gelu_pytorch_tanh",
        ),
        (
            "use_bidirectional_attention",
            serde_json::json!(true),
            "causal",
        ),
        (
            "layer_types",
            serde_json::json!(["full_attention"]),
            "one per layer",
        ),
        ("sliding_window", serde_json::json!(null), "sliding-window"),
        (
            "query_pre_attn_scalar",
            serde_json::json!(-1.0),
            "query_pre_attn_scalar",
        ),
    ] {
        let msg = with(key, value);
        assert!(msg.contains(key) && msg.contains(says), "{key}: {msg}");
    }
    let msg = with("model_type", serde_json::json!("gemma3"));
    assert!(msg.contains("gemma3_text"), "{msg}");
    let msg = with(
        "rope_scaling",
        serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
    );
    assert!(msg.contains("yarn") && msg.contains("linear"), "{msg}");
}

/// Phi-4-mini-instruct's config.json as on the Hub (transformers 4.45; the 48 LongRoPE
/// factors per list are filled in by [`phi4_mini`]).
fn phi4_mini() -> serde_json::Value {
    let factors = |scale: f64| (0..48).map(|i| 1.0 + scale * i as f64).collect::<Vec<_>>();
    serde_json::json!({
        "architectures": ["Phi3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 199999, "embd_pdrop": 0.0,
        "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu",
        "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
        "interpolate_factor": 1, "lm_head_bias": false, "max_position_embeddings": 131072,
        "mlp_bias": false, "model_type": "phi3", "num_attention_heads": 24,
        "num_hidden_layers": 32, "num_key_value_heads": 8,
        "original_max_position_embeddings": 4096, "pad_token_id": 199999,
        "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": factors(1.0), "short_factor": factors(0.01),
                         "type": "longrope"},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": true,
        "vocab_size": 200064
    })
}

#[test]
fn phi_configs_parse() {
    let c = parse(&phi4_mini().to_string()).unwrap();
    assert_eq!(c.model_type(), ModelType::Phi3);
    assert!(c.fused_projections() && c.tie_word_embeddings && !c.qkv_bias() && !c.o_bias());
    assert_eq!((c.head_dim(), c.rotary_dim()), (128, 96));
    assert_eq!(
        c.linear_modules(),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    );
    assert_eq!(c.linear_shape("qkv_proj"), Some(((24 + 2 * 8) * 128, 3072)));
    assert_eq!(c.linear_shape("gate_up_proj"), Some((2 * 8192, 3072)));
    assert_eq!(
        c.linear_shape("q_proj"),
        None,
        "no separate q_proj in Phi-3"
    );
    // factor = 131072 / 4096 = 32.
    let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
    assert!((c.rope_attention_factor() - want).abs() < 1e-12);
    let (short, long) = (c.inv_freq(), c.inv_freq_long().unwrap());
    assert_eq!((short.len(), long.len()), (48, 48));
    // Pair 1 of 48: short factor 1.01, long factor 2, base 10000 over 96 rotated dims.
    let plain = 1.0 / 10000f32.powf(2.0 / 96.0);
    assert_eq!(short[1], 1.0 / (1.01f32 * 10000f32.powf(2.0 / 96.0)));
    assert_eq!(long[1], 1.0 / (2.0 * 10000f32.powf(2.0 / 96.0)));
    assert!(short[1] < plain && long[1] < short[1]);
    assert_eq!(c.layer_window(0), Some(262144));
    assert!(matches!(c.rope_kind(), RopeKind::LongRope { .. }));
    // What save_pretrained writes reads back to the same config.
    let back = parse(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert_eq!(back.inv_freq_long(), c.inv_freq_long());

    // Phi-3-mini-4k: no rope scaling, every head dimension rotates, a window of 2047.
    let mut v = phi4_mini();
    for key in ["rope_scaling", "partial_rotary_factor"] {
        v[key] = serde_json::Value::Null;
    }
    v["sliding_window"] = serde_json::json!(2047);
    let c = parse(&v.to_string()).unwrap();
    assert_eq!(c.rotary_dim(), c.head_dim());
    assert_eq!(c.rope_attention_factor(), 1.0);
    assert!(c.inv_freq_long().is_none());
    assert_eq!(c.layer_window(31), Some(2047));
}

#[test]
fn unsupported_phi_settings_name_the_field() {
    let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = phi4_mini();
        edit(&mut v);
        parse(&v.to_string()).unwrap_err().to_string()
    };
    let msg = refused(&|v| v["rope_scaling"]["short_factor"] = serde_json::json!([1.0, 2.0]));
    assert!(
        msg.contains("rope_scaling.short_factor") && msg.contains("48"),
        "{msg}"
    );
    let msg = refused(&|v| v["rope_scaling"]["long_factor"] = serde_json::json!([1.0, -2.0]));
    assert!(msg.contains("long_factor"), "{msg}");
    let msg = refused(&|v| v["partial_rotary_factor"] = serde_json::json!(0.0));
    assert!(msg.contains("partial_rotary_factor"), "{msg}");
    let msg = refused(&|v| v["partial_rotary_factor"] = serde_json::json!(0.001));
    assert!(
        msg.contains("partial_rotary_factor") && msg.contains("even"),
        "{msg}"
    );
    // LongRoPE and partial rotary where transformers does not run them.
    let msg = refused(&|v| v["model_type"] = serde_json::json!("llama"));
    assert!(
        msg.contains("partial_rotary_factor") && msg.contains("phi3 only"),
        "{msg}"
    );
    let msg = refused(&|v| {
        v["model_type"] = serde_json::json!("llama");
        v["partial_rotary_factor"] = serde_json::Value::Null;
        v["rope_scaling"]["short_factor"] = serde_json::json!(vec![1.0; 64]);
        v["rope_scaling"]["long_factor"] = serde_json::json!(vec![1.0; 64]);
    });
    assert!(
        msg.contains("longrope") && msg.contains("phi3 only"),
        "{msg}"
    );
    let msg = refused(&|v| v["model_type"] = serde_json::json!("phimoe"));
    assert!(msg.contains("phimoe") && msg.contains("phi3"), "{msg}");
}
