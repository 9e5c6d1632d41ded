// render renders a Helm chart's templates the way `helm template` does, with
// Go's text/template, the sprig functions and Helm's own (include, tpl,
// required, toYaml, .Files.Get), so the chart's templating is tested where no
// helm binary is available. Usage:
//
//	render CHART_DIR [-f values.yaml]... [--set a.b=value]...
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	yamlv2 "gopkg.in/yaml.v2"
	yaml "gopkg.in/yaml.v3"
)

func die(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "render: "+format+"\n", args...)
	os.Exit(1)
}

// readYAML reads a YAML file the way Helm reads values files: YAML turned
// into JSON and decoded, so every number is a float64 (templates that print
// a large number without `int64` get 4.194304e+06 here as under Helm).
func readYAML(path string) map[string]interface{} {
	data, err := os.ReadFile(path)
	if err != nil {
		die("%v", err)
	}
	parsed := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &parsed); err != nil {
		die("%s: %v", path, err)
	}
	asJSON, err := json.Marshal(parsed)
	if err != nil {
		die("%s: %v", path, err)
	}
	out := map[string]interface{}{}
	if err := json.Unmarshal(asJSON, &out); err != nil {
		die("%s: %v", path, err)
	}
	return out
}

// merge overlays src onto dst, recursing into maps, as Helm merges values files.
func merge(dst, src map[string]interface{}) {
	for k, v := range src {
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
}

// set applies one --set a.b.c=value, parsing value as YAML (so 3 is an int).
func set(values map[string]interface{}, assignment string) {
	eq := strings.IndexByte(assignment, '=')
	if eq < 0 {
		die("--set %q: want key=value", assignment)
	}
	// Helm's --set: integers are int64, true/false booleans, null nil, the
	// rest strings.
	raw := assignment[eq+1:]
	var value interface{} = raw
	if n, err := strconv.ParseInt(raw, 10, 64); err == nil {
		value = n
	} else if raw == "true" || raw == "false" {
		value = raw == "true"
	} else if raw == "null" {
		value = nil
	}
	keys := strings.Split(assignment[:eq], ".")
	m := values
	for _, k := range keys[:len(keys)-1] {
		next, ok := m[k].(map[string]interface{})
		if !ok {
			next = map[string]interface{}{}
			m[k] = next
		}
		m = next
	}
	m[keys[len(keys)-1]] = value
}

type files struct{ root string }

// Get returns a chart file's contents, or "" (as Helm does) when absent.
func (f files) Get(name string) string {
	data, err := os.ReadFile(filepath.Join(f.root, name))
	if err != nil {
		return ""
	}
	return string(data)
}

func main() {
	if len(os.Args) < 2 {
		die("usage: render CHART_DIR [-f values.yaml]... [--set a.b=value]...")
	}
	chartDir := os.Args[1]
	chart := readYAML(filepath.Join(chartDir, "Chart.yaml"))
	values := readYAML(filepath.Join(chartDir, "values.yaml"))
	for i := 2; i < len(os.Args); i++ {
		switch os.Args[i] {
		case "-f":
			i++
			merge(values, readYAML(os.Args[i]))
		case "--set":
			i++
			set(values, os.Args[i])
		default:
			die("unknown argument %q", os.Args[i])
		}
	}
	name, _ := chart["name"].(string)

	root := template.New("chart").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		if t, err = t.New("tpl").Parse(text); err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, data)
		return buf.String(), err
	}
	funcs["required"] = func(message string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf("%s", message)
		}
		return v, nil
	}
	funcs["toYaml"] = func(v interface{}) string {
		out, err := yamlv2.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(out), "\n")
	}
	root.Funcs(funcs)

	templateDir := filepath.Join(chartDir, "templates")
	entries, err := os.ReadDir(templateDir)
	if err != nil {
		die("%v", err)
	}
	var rendered []string
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(templateDir, e.Name()))
		if err != nil {
			die("%v", err)
		}
		tname := name + "/templates/" + e.Name()
		if _, err := root.New(tname).Parse(string(data)); err != nil {
			die("%v", err)
		}
		if !strings.HasPrefix(e.Name(), "_") && strings.HasSuffix(e.Name(), ".yaml") {
			rendered = append(rendered, tname)
		}
	}
	sort.Strings(rendered)

	top := map[string]interface{}{
		"Values": values,
		"Chart": map[string]interface{}{
			"Name": name, "Version": chart["version"], "AppVersion": chart["appVersion"],
		},
		"Release": map[string]interface{}{
			"Name": "test", "Namespace": "default", "Service": "Helm", "IsInstall": true,
		},
		"Files":        files{chartDir},
		"Capabilities": map[string]interface{}{"KubeVersion": map[string]interface{}{"Version": "v1.30.0"}},
	}
	for _, tname := range rendered {
		top["Template"] = map[string]interface{}{
			"Name": tname, "BasePath": name + "/templates",
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, tname, top); err != nil {
			die("%v", err)
		}
		body := strings.TrimSpace(buf.String())
		if body == "" {
			continue
		}
		fmt.Printf("---\n# Source: %s\n%s\n", tname, body)
	}
}
