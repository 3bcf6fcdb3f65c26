// Renders an Ollama TEMPLATE as Ollama fills it (Go's text/template with .Messages of role and content):
// reads {"template": ..., "messages": [...]} on stdin and writes the rendered text on stdout. Used by
// tests/export/test_ollama.py to compare a Modelfile's TEMPLATE with the chat template byte for byte.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
